// The pay step. The page never holds the payment webhook secret: it asks the payment provider
// (provider.py, a test stand-in for a hosted payment page) to charge a test card, the provider
// sends the signed event to the service, and the page then reads the order until the service
// says it is paid. Every call is bounded; so is every wait.
import { timeout, type Client, type Order } from "./api/client";

export type Card = "succeed" | "fail";

/** The provider's test cards: what the simulated charge does. */
export const TEST_CARDS: { card: Card; label: string }[] = [
  { card: "succeed", label: "4242 4242 4242 4242 — pays" },
  { card: "fail", label: "4000 0000 0000 0002 — declined" },
];

/** The provider tries the shop up to 3 times, 5 s each, with back-off: wait a little longer. */
const PROVIDER_TIMEOUT_MS = 25_000;
/** Tries of one press of "Pay" when no answer came (network error, timeout, 503). */
const PAY_TRIES = 2;

export type PayResult =
  /** The service's outcome of the event (docs/API.md, Payments): paid, recorded, duplicate... */
  | { kind: "answered"; outcome: string }
  /** The provider said no (502: the shop refused or could not be reached; 422: a page bug). */
  | { kind: "refused"; detail: string }
  | { kind: "unreachable"; reason: string };

function newKey(): string {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** One press of "Pay". Its payment_id is the provider's event id: sent again after a lost
 *  answer, it is the same event, which the service takes once (outcome `duplicate`). */
export async function pay(provider: string, order: Order, card: Card): Promise<PayResult> {
  const body = JSON.stringify({
    payment_id: newKey(),
    order_id: order.id,
    amount: order.total,
    currency: order.currency,
    outcome: card,
  });
  let reason = "";
  for (let attempt = 0; attempt < PAY_TRIES; attempt++) {
    if (attempt) await sleep(1000);
    try {
      const response = await fetch(`${provider.replace(/\/$/, "")}/pay`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body,
        signal: AbortSignal.timeout(PROVIDER_TIMEOUT_MS),
      });
      const answer: unknown = await response.json().catch(() => null);
      if (response.ok && isRecord(answer) && typeof answer.outcome === "string") {
        return { kind: "answered", outcome: answer.outcome };
      }
      reason = isRecord(answer) && typeof answer.detail === "string" ? answer.detail : `HTTP ${response.status}`;
      if (response.status !== 503) return { kind: "refused", detail: reason };
    } catch (err) {
      reason = err instanceof DOMException && err.name === "TimeoutError" ? "no answer in time" : "network error";
    }
  }
  return { kind: "unreachable", reason };
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null;
}

/** The order as the service has it now, or null when it could not be read. */
export async function readOrder(client: Client, id: string): Promise<Order | null> {
  try {
    const { data } = await client.GET("/v1/orders/{order_id}", { params: { path: { order_id: id } }, signal: timeout() });
    return data ?? null;
  } catch {
    return null;
  }
}

/** Reads the order until it is no longer pending, at most `tries` times `intervalMs` apart;
 *  the last order read (maybe still pending), or null when none could be read. The service
 *  has no If-None-Match, so each read is a plain GET (served from its cache when it can). */
export async function settle(client: Client, id: string, tries = 10, intervalMs = 1000): Promise<Order | null> {
  let last: Order | null = null;
  for (let n = 0; n < tries; n++) {
    if (n) await sleep(intervalMs);
    last = (await readOrder(client, id)) ?? last;
    if (last !== null && last.status !== "pending") return last;
  }
  return last;
}

/** Why a cancelled order was cancelled (`customer`, `staff`, `payment_timeout`), from its timeline. */
export async function cancelReason(client: Client, id: string): Promise<string | null> {
  try {
    const { data } = await client.GET("/v1/orders/{order_id}/events", { params: { path: { order_id: id } }, signal: timeout() });
    const cancelled = (data?.items ?? []).filter((event) => event.type === "order.cancelled").pop();
    const reason = cancelled?.data.reason;
    return typeof reason === "string" ? reason : null;
  } catch {
    return null;
  }
}

/** When the order is due (created_at + the service's payment timeout), or null when the page
 *  was not told the timeout: the API does not expose it. */
export function paymentDeadline(order: Order, timeoutS: number | null): Date | null {
  return timeoutS === null ? null : new Date(Date.parse(order.created_at) + timeoutS * 1000);
}

/** Watches a pending order for a change made elsewhere (its expiry, a cancel, staff): reads it
 *  just after its deadline when known (then every 2 s, 10 times: clocks differ), else every
 *  30 s for 30 minutes. Calls `changed` once with the order no longer pending; the returned
 *  function stops the watch. */
export function watchOrder(client: Client, order: Order, timeoutS: number | null, changed: (order: Order) => void): () => void {
  let stopped = false;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const deadline = paymentDeadline(order, timeoutS);
  const [firstMs, everyMs, tries] =
    deadline === null ? [30_000, 30_000, 60] : [Math.max(1000, deadline.getTime() + 1500 - Date.now()), 2000, 10];
  let left = tries;
  const check = async () => {
    if (stopped) return;
    const now = await readOrder(client, order.id);
    if (stopped) return;
    if (now !== null && now.status !== "pending") {
      stopped = true;
      changed(now);
      return;
    }
    if (--left > 0) timer = setTimeout(() => void check(), everyMs);
  };
  timer = setTimeout(() => void check(), firstMs);
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
