// One checkout attempt = one Idempotency-Key, kept in sessionStorage with the exact body,
// and sent again, unchanged, on every retry of that attempt (a network error, a timeout, a
// 503 or 409 idempotency-in-progress after Retry-After, a reload): the service creates at
// most one order per key, so retrying can never order twice (docs/API.md, frontend guide).
import { problemSlug, retryAfter, timeout, type Client, type Order, type OrderCreate, type Problem } from "./api/client";

const STORE = "checkout.attempt";
/** Automatic retries of one press of "place order"; then the buyer decides (same key). */
export const MAX_RETRIES = 4;

export interface Attempt {
  key: string;
  body: OrderCreate;
  /** True while a request of this attempt may be under way: a reload resumes it. */
  sending: boolean;
}

export type Outcome =
  | { kind: "placed"; order: Order; replayed: boolean }
  | { kind: "problem"; problem: Problem; status: number; retryAfter: number | null }
  | { kind: "gave-up"; reason: string };

function newKey(): string {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function currentAttempt(): Attempt | null {
  const raw = sessionStorage.getItem(STORE);
  if (raw === null) return null;
  try {
    return JSON.parse(raw) as Attempt;
  } catch {
    sessionStorage.removeItem(STORE);
    return null;
  }
}

function save(attempt: Attempt): void {
  sessionStorage.setItem(STORE, JSON.stringify(attempt));
}

export function forgetAttempt(): void {
  sessionStorage.removeItem(STORE);
}

/** The attempt for this body: the stored one when the cart, address and email are the same
 *  (a retry), else a new one with a new key (another body under the old key would be 422). */
export function attemptFor(body: OrderCreate): Attempt {
  const current = currentAttempt();
  if (current !== null && JSON.stringify(current.body) === JSON.stringify(body)) return current;
  const attempt = { key: newKey(), body, sending: false };
  save(attempt);
  return attempt;
}

// 409 idempotency-in-progress and 5xx can succeed unchanged; other problems need the buyer.
function retryable(status: number, problem: Problem | undefined): boolean {
  if (status === 409) return problem !== undefined && problemSlug(problem) === "idempotency-in-progress";
  return status === 408 || status >= 500;
}

function backoff(retry: number): number {
  const base = 500 * 2 ** retry; // 0.5 s, 1 s, 2 s, 4 s
  return base / 2 + Math.random() * (base / 2);
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Sends the attempt until it is placed, refused, or MAX_RETRIES retries went by. */
export async function submit(
  client: Client,
  attempt: Attempt,
  onRetry: (retry: number, waitMs: number, why: string) => void,
): Promise<Outcome> {
  save({ ...attempt, sending: true });
  try {
    for (let retry = 0; ; retry++) {
      let waitMs = backoff(retry);
      let why: string;
      try {
        const { data, error, response } = await client.POST("/v1/orders", {
          params: { header: { "Idempotency-Key": attempt.key } },
          body: attempt.body,
          signal: timeout(),
        });
        if (data !== undefined) {
          forgetAttempt();
          return { kind: "placed", order: data, replayed: response.headers.get("Idempotent-Replayed") === "true" };
        }
        const wait = retryAfter(response);
        if (!retryable(response.status, error)) {
          return { kind: "problem", problem: error, status: response.status, retryAfter: wait };
        }
        if (wait !== null) waitMs = Math.max(waitMs, wait * 1000);
        why = error?.title ?? `HTTP ${response.status}`;
      } catch (err) {
        why = err instanceof DOMException && err.name === "TimeoutError" ? "no answer in time" : "network error";
      }
      if (retry >= MAX_RETRIES) return { kind: "gave-up", reason: why };
      onRetry(retry + 1, waitMs, why);
      await sleep(waitMs);
    }
  } finally {
    const stored = currentAttempt();
    if (stored !== null && stored.key === attempt.key) save({ ...stored, sending: false });
  }
}
