console.log("web_plugin loaded");
