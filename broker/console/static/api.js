// The REST client: every request carries the workspace key in its Authorization
// header (never in a URL), and every answer is the broker's envelope.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** True for a refused credential: wrong, revoked, or of a deleted workspace. */
export function isRefusedKey(error) {
  return error instanceof ApiError && error.status === 401;
}

export class Api {
  constructor(key, base = "") {
    this.key = key;
    this.base = base;
    this.onRefused = null; // called once when the daemon refuses the key
  }

  async request(method, path, body) {
    const headers = { Authorization: `Bearer ${this.key}` };
    const init = { method, headers, cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(this.base + path, init);
    } catch (err) {
      throw new ApiError(0, "unreachable", "the daemon does not answer");
    }
    if (response.status === 204) return null;
    let envelope = null;
    try {
      envelope = await response.json();
    } catch (err) {
      throw new ApiError(response.status, "bad_answer", `HTTP ${response.status}`);
    }
    if (!response.ok || !envelope || envelope.ok !== true) {
      const error = (envelope && envelope.error) || {};
      const failure = new ApiError(response.status, error.code || "http_error",
        error.message || `HTTP ${response.status}`);
      if (failure.status === 401 && this.onRefused) this.onRefused(failure);
      throw failure;
    }
    return envelope.data;
  }

  get(path, query) {
    if (query) {
      const params = new URLSearchParams();
      for (const [name, value] of Object.entries(query)) {
        if (value !== undefined && value !== null) params.set(name, String(value));
      }
      const text = params.toString();
      if (text) path += `?${text}`;
    }
    return this.request("GET", path);
  }

  post(path, body = {}) {
    return this.request("POST", path, body);
  }

  delete(path) {
    return this.request("DELETE", path);
  }
}

/** A path segment, escaped. */
export function seg(value) {
  return encodeURIComponent(String(value));
}
