// The only way the page calls the service: openapi-fetch over the types that
// openapi-typescript generated from docs/openapi.json (schema.d.ts, `make client`).
import createClient from "openapi-fetch";
import type { components, paths } from "./schema";

export type Product = components["schemas"]["Product"];
export type Order = components["schemas"]["Order"];
export type OrderCreate = components["schemas"]["OrderCreate"];
export type Problem = components["schemas"]["Problem"];

/** Every call is bounded: a hung connection becomes an error the page can retry. */
export const TIMEOUT_MS = 10_000;

export function makeClient(baseUrl: string, token: () => string | null) {
  const client = createClient<paths>({ baseUrl });
  client.use({
    onRequest({ request }) {
      const value = token();
      if (value) request.headers.set("Authorization", `Bearer ${value}`);
      return request;
    },
  });
  return client;
}

export type Client = ReturnType<typeof makeClient>;

export const timeout = () => AbortSignal.timeout(TIMEOUT_MS);

/** The last segment of a problem's `type` (docs/API.md: branch on it, not on the title). */
export function problemSlug(problem: Problem): string {
  return problem.type.slice(problem.type.lastIndexOf("/") + 1);
}

/** Retry-After in seconds (the service sends delta-seconds), or null. */
export function retryAfter(response: Response): number | null {
  const value = response.headers.get("Retry-After");
  if (value === null || !/^\d+$/.test(value.trim())) return null;
  return Number(value);
}
