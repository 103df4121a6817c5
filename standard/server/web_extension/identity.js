// comfyserve: who is signed in, inside the ComfyUI page.
// A user button in the action bar (the account's name) opens a menu with the
// dashboard, the account page, the admin page (admins) and "Log out"; the same
// entries are commands in the comfyserve menu. GET /api/comfyserve/me says who
// the page is signed in as. A 401 from the API (session ended, account removed
// or disabled) takes the browser to /login instead of showing a raw message.
// Comfy.org's own sign-in button is hidden: accounts here are the server's.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const MENU_ID = "comfyserve-user-menu";
const STYLE = `
[data-testid="login-button"] { display: none !important; }
#${MENU_ID} { position: fixed; z-index: 10000; min-width: 13rem; padding: 0.4rem 0;
  background: var(--comfy-menu-bg, #2b2b2b); color: var(--fg-color, #ddd);
  border: 1px solid var(--border-color, #555); border-radius: 8px; box-shadow: 0 6px 18px rgba(0,0,0,.45);
  font: 14px system-ui, sans-serif; }
#${MENU_ID} .who { padding: 0.4rem 0.9rem 0.6rem; border-bottom: 1px solid var(--border-color, #555);
  margin-bottom: 0.3rem; }
#${MENU_ID} .who small { display: block; opacity: .7; }
#${MENU_ID} a, #${MENU_ID} button { display: block; width: 100%; box-sizing: border-box; text-align: left;
  padding: 0.4rem 0.9rem; color: inherit; text-decoration: none; background: none; border: 0;
  font: inherit; cursor: pointer; }
#${MENU_ID} a:hover, #${MENU_ID} button:hover, #${MENU_ID} a:focus, #${MENU_ID} button:focus {
  background: rgba(255,255,255,.08); outline: none; }
`;

async function whoAmI() {
  try {
    const response = await fetch("/api/comfyserve/me", { credentials: "same-origin", cache: "no-store" });
    if (response.status === 401) {
      return { status: 401 };
    }
    return response.ok ? { status: 200, me: await response.json() } : { status: response.status };
  } catch {
    return { status: 0 };
  }
}

let redirecting = false;

/** The login page, coming back here afterwards. */
export function goToLogin() {
  if (redirecting) {
    return;
  }
  redirecting = true;
  window.comfyserveLoginRedirect = true;
  const next = window.location.pathname + window.location.search;
  window.location.assign(`/login?next=${encodeURIComponent(next)}`);
}

function watchForSignOut() {
  // Every API call of the page goes through api.fetchApi: a 401 there means the session is gone.
  const fetchApi = api.fetchApi.bind(api);
  api.fetchApi = async (route, options) => {
    const response = await fetchApi(route, options);
    if (response.status === 401) {
      goToLogin();
    }
    return response;
  };
  // A revoked session also closes the event socket, whose reconnects then fail: ask who we are.
  api.addEventListener("reconnecting", async () => {
    if ((await whoAmI()).status === 401) {
      goToLogin();
    }
  });
}

function logout() {
  const form = document.createElement("form");
  form.method = "post";
  form.action = "/logout";
  form.style.display = "none";
  document.body.appendChild(form);
  form.submit();
}

function menuEntries(me) {
  const entries = [];
  const links = me.links ?? {};
  if (links.dashboard) entries.push({ label: "Dashboard", href: links.dashboard });
  if (links.account) entries.push({ label: "My account", href: links.account });
  if (links.admin) entries.push({ label: "Admin", href: links.admin });
  if (links.logout) entries.push({ label: "Log out", action: logout });
  return entries;
}

function closeMenu() {
  document.getElementById(MENU_ID)?.remove();
  document.removeEventListener("pointerdown", closeOnOutside, true);
  document.removeEventListener("keydown", closeOnEscape, true);
}

function closeOnOutside(event) {
  const menu = document.getElementById(MENU_ID);
  if (menu && !menu.contains(event.target)) {
    closeMenu();
  }
}

function closeOnEscape(event) {
  if (event.key === "Escape") {
    closeMenu();
  }
}

function openMenu(me, anchor) {
  if (document.getElementById(MENU_ID)) {
    closeMenu();
    return;
  }
  const menu = document.createElement("div");
  menu.id = MENU_ID;
  menu.setAttribute("role", "menu");
  menu.setAttribute("aria-label", "Account");
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = me.name ?? "Signed in with the token";
  if (me.name) {
    const role = document.createElement("small");
    role.textContent = me.admin ? "admin" : "user";
    who.appendChild(role);
  }
  menu.appendChild(who);
  for (const entry of menuEntries(me)) {
    const item = document.createElement(entry.href ? "a" : "button");
    item.setAttribute("role", "menuitem");
    item.textContent = entry.label;
    if (entry.href) {
      item.href = entry.href;
    } else {
      item.type = "button";
      item.addEventListener("click", entry.action);
    }
    menu.appendChild(item);
  }
  const box = anchor?.getBoundingClientRect?.() ?? { bottom: 48, right: window.innerWidth - 8 };
  menu.style.top = `${Math.round(box.bottom + 6)}px`;
  menu.style.right = `${Math.max(8, Math.round(window.innerWidth - box.right))}px`;
  document.body.appendChild(menu);
  document.addEventListener("pointerdown", closeOnOutside, true);
  document.addEventListener("keydown", closeOnEscape, true);
  menu.querySelector("[role=menuitem]")?.focus();
}

function commandsFor(me) {
  const go = (href) => () => window.location.assign(href);
  const links = me.links ?? {};
  const commands = [];
  if (links.dashboard) commands.push({ id: "Comfyserve.Dashboard", label: "Dashboard", function: go(links.dashboard) });
  if (links.account) commands.push({ id: "Comfyserve.Account", label: "My account", function: go(links.account) });
  if (links.admin) commands.push({ id: "Comfyserve.Admin", label: "Admin", function: go(links.admin) });
  if (links.logout) commands.push({ id: "Comfyserve.Logout", label: "Log out", function: logout });
  return commands;
}

const answer = await whoAmI();
const me = answer.me;
window.comfyserveMe = me ?? null;
if (me?.login) {
  watchForSignOut();
}
const style = document.createElement("style");
style.textContent = STYLE;
document.head.appendChild(style);

const commands = me ? commandsFor(me) : [];
const label = me?.name ?? "Token session";
app.registerExtension({
  name: "comfyserve.identity",
  commands,
  menuCommands: commands.length ? [{ path: ["comfyserve"], commands: commands.map((c) => c.id) }] : [],
  actionBarButtons: me?.login ? [{
    icon: "icon-[lucide--circle-user]",
    label,
    tooltip: me.name ? `Signed in as ${me.name}` : "Signed in with the token",
    onClick: (event) => openMenu(me, event?.currentTarget ?? event?.target),
  }] : [],
});
