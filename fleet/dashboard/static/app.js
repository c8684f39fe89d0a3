// The dashboard's shell: sign-in with an API token, navigation by the URL's hash (which
// holds page names, ids and filters, never the token), the error tray, and the pages.

import { render } from "preact";
import { useCallback, useEffect, useState } from "preact/hooks";

import { api, onUnauthorized, tokenStore } from "./api.js";
import { DevicePage, DeviceList } from "./devices.js";
import { HealthPage } from "./health.js";
import { AuditPage, RegistryPage } from "./registry.js";
import { NewRollout, RolloutList, RolloutPage } from "./rollouts.js";
import { ErrorContext, ErrorTray, UserContext, html, useErrorTray } from "./ui.js";

function parseHash() {
  const [path, search = ""] = location.hash.replace(/^#\/?/, "").split("?");
  return { parts: path.split("/").filter(Boolean).map(decodeURIComponent), params: new URLSearchParams(search) };
}

function useRoute() {
  const [route, setRoute] = useState(parseHash);
  useEffect(() => {
    const changed = () => setRoute(parseHash());
    addEventListener("hashchange", changed);
    return () => removeEventListener("hashchange", changed);
  }, []);
  return route;
}

function Page({ route, user }) {
  const [section, id] = route.parts;
  if (section === "devices") return id ? html`<${DevicePage} id=${id} />` : html`<${DeviceList} params=${route.params} />`;
  if (section === "health") return html`<${HealthPage} params=${route.params} />`;
  if (section === "registry") return html`<${RegistryPage} />`;
  if (section === "audit") {
    return user.role === "admin" ? html`<${AuditPage} />` : html`<p class="empty">The audit log is for admins.</p>`;
  }
  if (section === "rollouts" && id === "new") return html`<${NewRollout} />`;
  if (section === "rollouts" && id) return html`<${RolloutPage} id=${id} />`;
  return html`<${RolloutList} />`;
}

function Nav({ route, user, logout }) {
  const section = route.parts[0] ?? "rollouts";
  const links = [
    ["rollouts", "Rollouts"],
    ["devices", "Devices"],
    ["health", "Health"],
    ["registry", "Registry"],
    ...(user.role === "admin" ? [["audit", "Audit log"]] : []),
  ];
  return html`<header class="top">
    <a class="brand" href="#/rollouts">edgefleet</a>
    <nav>
      ${links.map(
        ([name, label]) => html`<a href=${`#/${name}`} class=${section === name ? "active" : ""}>${label}</a>`,
      )}
    </nav>
    <span class="who" data-role=${user.role}>${user.name} · ${user.role}</span>
    <button class="link" onClick=${logout}>Log out</button>
  </header>`;
}

function Login({ onLogin, report }) {
  const [token, setToken] = useState("");
  const [busy, setBusy] = useState(false);
  const submit = async (event) => {
    event.preventDefault();
    setBusy(true);
    try {
      onLogin(token.trim(), await api("/whoami", { token: token.trim() }));
    } catch (error) {
      report(error.status === 401 ? new Error("That token is unknown or revoked.") : error);
    } finally {
      setBusy(false);
    }
  };
  return html`<form class="login" onSubmit=${submit}>
    <h1>edgefleet</h1>
    <p>
      ${"Sign in with an API token: "}<code>edgefleet fleet serve</code>${" writes the first admin token to "}
      <code>DATA_DIR/admin.token</code>${", and admins make others (viewer, operator, admin) with "}
      <code>POST /api/v1/tokens</code>${". It is kept in this tab only, until you log out or close it."}
    </p>
    <label class="field">API token
      <input type="password" name="token" autocomplete="off" required value=${token} onInput=${(e) => setToken(e.target.value)} />
    </label>
    <button class="primary" disabled=${busy}>Sign in</button>
  </form>`;
}

function App() {
  const route = useRoute();
  const tray = useErrorTray();
  const [user, setUser] = useState(null);
  const [checking, setChecking] = useState(Boolean(tokenStore.get()));
  const logout = useCallback(() => {
    tokenStore.clear();
    setUser(null);
  }, []);
  useEffect(() => {
    onUnauthorized(() => {
      if (tokenStore.get()) tray.report(new Error("The server no longer accepts this token: sign in again."));
      tokenStore.clear();
      setUser(null);
    });
    if (!tokenStore.get()) return;
    api("/whoami")
      .then(setUser, (error) => error.status !== 401 && tray.report(error))
      .finally(() => setChecking(false));
  }, []);
  const login = (token, who) => {
    tokenStore.set(token);
    setUser(who);
  };
  return html`<${ErrorContext.Provider} value=${tray}>
    <${UserContext.Provider} value=${user}>
      ${user ? html`<${Nav} route=${route} user=${user} logout=${logout} />` : null}
      <${ErrorTray} errors=${tray.errors} dismiss=${tray.dismiss} />
      <main>
        ${user
          ? html`<${Page} route=${route} user=${user} />`
          : checking
            ? null
            : html`<${Login} onLogin=${login} report=${tray.report} />`}
      </main>
    <//>
  <//>`;
}

render(html`<${App} />`, document.getElementById("app"));
