// The fleet's JSON API from the browser. The API token lives in this tab's sessionStorage
// (never a URL or a cookie) and goes out as a Bearer header; every failure becomes an
// ApiError carrying the server's own message.

const TOKEN_KEY = "edgefleet.token";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export const tokenStore = {
  get: () => sessionStorage.getItem(TOKEN_KEY),
  set: (token) => sessionStorage.setItem(TOKEN_KEY, token),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

let unauthorized = () => {};

/** Called when the server answers 401: the token was revoked, or is wrong. */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

/**
 * Call /api/v1{path}. With `total`, resolve to {data, total} (the X-Total-Count header).
 */
export async function api(path, { method = "GET", body, token = tokenStore.get(), total = false } = {}) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(`api/v1${path}`, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
    });
  } catch (error) {
    throw new ApiError(0, `${method} ${path}: the fleet server did not answer (${error.message})`);
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    if (response.status === 401) unauthorized();
    const why = describe(data) || response.statusText;
    throw new ApiError(response.status, `${method} ${path}: ${response.status} ${why}`);
  }
  return total ? { data, total: Number(response.headers.get("X-Total-Count") ?? 0) } : data;
}

function describe(data) {
  const detail = data?.detail ?? data?.error;
  if (Array.isArray(detail)) {
    return detail.map((d) => `${(d.loc ?? []).slice(1).join(".")}: ${d.msg}`).join("; ");
  }
  return typeof detail === "string" ? detail : "";
}

/** A query string from the entries whose value is set (arrays repeat the key). */
export function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    for (const item of Array.isArray(value) ? value : [value]) {
      if (item !== undefined && item !== null && item !== "") search.append(key, String(item));
    }
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}
