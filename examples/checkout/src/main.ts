// The reference checkout page: catalog, cart, place order (one Idempotency-Key per attempt,
// checkout.ts), confirmation and the pay step (pay.ts), the customer's orders with cancel
// (If-Match). Plain DOM.
import { makeClient, problemSlug, timeout, type Order, type OrderCreate, type Problem, type Product } from "./api/client";
import { attemptFor, currentAttempt, forgetAttempt, submit, type Attempt, type Outcome } from "./checkout";
import { formatMoney } from "./money";
import { cancelReason, pay, paymentDeadline, settle, TEST_CARDS, watchOrder, type Card } from "./pay";

// Where the service is and who the buyer is: ?api= and ?token=; where the payment provider is,
// ?provider=, and the service's ORDERS_PAYMENT_TIMEOUT_S, ?payment_timeout_s= (the API does not
// expose it): what `make demo` prints. Kept in sessionStorage for reloads and taken out of the
// address bar.
const CONFIG = ["api", "token", "provider", "payment_timeout_s"];
const params = new URLSearchParams(location.search);
for (const name of CONFIG) {
  const value = params.get(name);
  if (value) sessionStorage.setItem(`checkout.${name}`, value);
}
if (CONFIG.some((name) => params.has(name))) history.replaceState(null, "", location.pathname);
const apiBase = sessionStorage.getItem("checkout.api") ?? import.meta.env.VITE_ORDERS_API ?? "http://127.0.0.1:8000";
const token = () => sessionStorage.getItem("checkout.token");
const client = makeClient(apiBase, token);
const provider = sessionStorage.getItem("checkout.provider");
const paymentTimeoutS = ((value) => (Number.isFinite(value) && value > 0 ? value : null))(
  Number(sessionStorage.getItem("checkout.payment_timeout_s")),
);

const PAGE_SIZE = 5;

function $<T extends HTMLElement = HTMLElement>(selector: string): T {
  const el = document.querySelector<T>(selector);
  if (el === null) throw new Error(`missing ${selector}`);
  return el;
}

function el<K extends keyof HTMLElementTagNameMap>(tag: K, text = "", cls = ""): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (text) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

function customerOf(jwt: string): string {
  try {
    const payload = jwt.split(".")[1] ?? "";
    const claims: unknown = JSON.parse(atob(payload.replace(/-/g, "+").replace(/_/g, "/")));
    if (typeof claims === "object" && claims !== null && "sub" in claims) return String(claims.sub);
  } catch {}
  return "?";
}

const wait = (seconds: number) =>
  seconds >= 90 ? `about ${Math.ceil(seconds / 60)} minutes` : `${seconds} second${seconds === 1 ? "" : "s"}`;

// ------------------------------------------------------------------ catalog and cart

const products = new Map<string, Product>();
const cart = new Map<string, number>(JSON.parse(sessionStorage.getItem("checkout.cart") ?? "[]"));
let productCursor: string | null = null;

function saveCart(): void {
  sessionStorage.setItem("checkout.cart", JSON.stringify([...cart]));
}

const nameOf = (sku: string) => {
  const product = products.get(sku);
  return product ? `${product.name} (${sku})` : sku;
};

const withStock = (sku: string) => {
  const stock = products.get(sku)?.stock;
  return stock === undefined ? nameOf(sku) : `${nameOf(sku)}, ${stock > 0 ? `only ${stock} left` : "sold out"}`;
};

/** A GET's answer, or null (and a sentence in `where`) when the service cannot be reached. */
async function reach<T>(call: () => Promise<T>, where: HTMLElement, what: string): Promise<T | null> {
  try {
    return await call();
  } catch {
    where.replaceChildren(el(where.tagName === "TBODY" ? "tr" : "li", `${what} could not be loaded: the shop cannot be reached. Reload the page to try again.`));
    return null;
  }
}

async function loadProducts(more = false): Promise<void> {
  const answer = await reach(
    () =>
      client.GET("/v1/products", {
        params: { query: { limit: 20, ...(more && productCursor ? { cursor: productCursor } : {}) } },
        signal: timeout(),
      }),
    $("#products"),
    "The catalog",
  );
  if (answer === null) return;
  const { data, error } = answer;
  if (data === undefined) {
    $("#products").replaceChildren(el("tr", `The catalog could not be loaded: ${explain(error, null)}`));
    return;
  }
  const rows = data.items.map((product) => {
    products.set(product.sku, product);
    const row = el("tr");
    row.dataset.sku = product.sku;
    const name = el("td", product.name);
    name.append(" ", el("span", product.sku, "sku"));
    const qty = el("input");
    Object.assign(qty, { type: "number", min: "1", max: "1000", value: "1" });
    qty.setAttribute("aria-label", `Quantity of ${product.name}`);
    const add = el("button", "Add to cart");
    add.type = "button";
    add.addEventListener("click", () => {
      const n = Math.max(1, Math.min(1000, Math.trunc(Number(qty.value) || 1)));
      cart.set(product.sku, (cart.get(product.sku) ?? 0) + n);
      saveCart();
      renderCart();
    });
    const action = el("td");
    action.append(qty, " ", add);
    row.append(
      name,
      el("td", formatMoney(product.unit_price, product.currency), "num"),
      el("td", product.stock > 0 ? String(product.stock) : "sold out", product.stock > 0 ? "num" : "num out"),
      action,
    );
    return row;
  });
  if (more) $("#products").append(...rows);
  else $("#products").replaceChildren(...rows);
  productCursor = data.next_cursor ?? null;
  $("#more-products").hidden = productCursor === null;
  renderCart();
}

function renderCart(): void {
  const lines = [...cart].map(([sku, quantity]) => {
    const product = products.get(sku);
    const li = el("li", `${quantity} × ${product?.name ?? sku}`);
    li.dataset.sku = sku;
    if (product) li.append(` — ${formatMoney(product.unit_price * quantity, product.currency)}`);
    const remove = el("button", "Remove");
    remove.type = "button";
    remove.addEventListener("click", () => {
      cart.delete(sku);
      saveCart();
      renderCart();
    });
    li.append(" ", remove);
    return li;
  });
  $("#cart-lines").replaceChildren(...(lines.length ? lines : [el("li", "Your cart is empty.")]));
  // The service refuses a cart in several currencies; show one total per currency.
  const totals = new Map<string, number>();
  for (const [sku, quantity] of cart) {
    const product = products.get(sku);
    if (product) totals.set(product.currency, (totals.get(product.currency) ?? 0) + product.unit_price * quantity);
  }
  $("#cart-total").textContent = totals.size
    ? `Total: ${[...totals].map(([currency, minor]) => formatMoney(minor, currency)).join(" + ")}`
    : "";
}

// ------------------------------------------------------------------ place order

const form = $<HTMLFormElement>("#checkout");
const status = $("#checkout-status");

function field(name: string): HTMLInputElement {
  return form.elements.namedItem(name) as HTMLInputElement;
}

const ADDRESS = ["name", "line1", "line2", "city", "postal_code", "country"] as const;

function orderBody(): OrderCreate {
  const text = (name: string) => field(name).value.trim();
  return {
    email: text("email"),
    items: [...cart].map(([sku, quantity]) => ({ sku, quantity })),
    shipping_address: {
      name: text("name"),
      line1: text("line1"),
      line2: text("line2") || null,
      city: text("city"),
      postal_code: text("postal_code"),
      country: text("country").toUpperCase(),
    },
  };
}

function fillForm(body: OrderCreate): void {
  field("email").value = body.email;
  for (const name of ADDRESS) field(name).value = body.shipping_address[name] ?? "";
}

function say(text: string, error = false): void {
  status.textContent = text;
  status.classList.toggle("error", error);
}

function clearFieldErrors(): void {
  for (const slot of form.querySelectorAll<HTMLElement>(".field-error")) slot.textContent = "";
  for (const input of form.querySelectorAll("input")) input.removeAttribute("aria-invalid");
}

/** 422 validation-error: each message next to its field (items.0.quantity under the cart). */
function showFieldErrors(problem: Problem): boolean {
  let shown = false;
  for (const { field: path, message } of problem.errors ?? []) {
    const slotName = path.startsWith("items") ? "items" : path;
    const slot = form.querySelector<HTMLElement>(`.field-error[data-field="${CSS.escape(slotName)}"]`);
    if (slot === null) continue;
    const line = path.startsWith("items.") ? `${lineName(path)}: ${message}` : message;
    slot.textContent = slot.textContent ? `${slot.textContent} ${line}` : line;
    const input = form.elements.namedItem(path.split(".").pop() ?? "");
    if (input instanceof HTMLInputElement) input.setAttribute("aria-invalid", "true");
    shown = true;
  }
  return shown;
}

function lineName(path: string): string {
  const index = Number(path.split(".")[1]);
  const sku = [...cart.keys()][index];
  return sku === undefined ? "Cart" : nameOf(sku);
}

/** A sentence a buyer understands, from the problem's type and its members. */
function explain(problem: Problem, retryAfterS: number | null): string {
  switch (problemSlug(problem)) {
    case "insufficient-stock":
      return `Not enough stock for ${(problem.skus ?? []).map(withStock).join(", ")}. Lower the quantity and try again; nothing was reserved.`;
    case "unknown-sku":
      return `No longer sold: ${(problem.skus ?? []).map(nameOf).join(", ")}. Remove it from your cart.`;
    case "rate-limited":
      return `You have placed too many orders in a short time. Please wait ${wait(retryAfterS ?? 60)} before trying again.`;
    case "too-many-pending-orders":
      return `You already have ${problem.max_pending_orders ?? "the most"} orders waiting for payment. Pay or cancel one of them first.`;
    case "validation-error":
      return "Please correct the highlighted fields.";
    case "unauthorized":
      return "Your session has expired: please sign in again.";
    case "idempotency-key-reuse":
      return "This order changed while it was being placed: please press “Place order” again.";
    default:
      return `${problem.title}: ${problem.detail}`;
  }
}

function showOutcome(outcome: Outcome): void {
  const button = $<HTMLButtonElement>("#place");
  button.disabled = false;
  if (outcome.kind === "placed") {
    say("");
    cart.clear();
    saveCart();
    renderCart();
    showConfirmation(outcome.order, outcome.replayed);
    void loadProducts();
    void loadOrders();
    return;
  }
  if (outcome.kind === "gave-up") {
    // The attempt and its key stay: pressing the button again cannot order twice.
    say(`We could not reach the shop (${outcome.reason}). Your order may or may not have been placed: press “Place order” again, it will not be ordered twice.`, true);
    return;
  }
  if (problemSlug(outcome.problem) === "idempotency-key-reuse") forgetAttempt();
  const { problem, retryAfter } = outcome;
  if (problemSlug(problem) === "validation-error" && !showFieldErrors(problem)) {
    say(`${problem.title}: ${problem.detail}`, true); // no field of the form to show it by
    return;
  }
  if (problemSlug(problem) === "insufficient-stock") {
    // The catalog's stock is stale: show it as it is now, and in the message.
    void loadProducts().finally(() => say(explain(problem, retryAfter), true));
    return;
  }
  say(explain(problem, retryAfter), true);
}

function showConfirmation(order: Order, replayed: boolean): void {
  const box = $("#confirmation");
  const title = el("h3", "Thank you, your order is placed");
  const lines = el("ul");
  for (const item of order.items) lines.append(el("li", `${item.quantity} × ${item.name} — ${formatMoney(item.line_total, order.currency)}`));
  box.replaceChildren(
    title,
    el("p", `Order ${order.id}, total ${formatMoney(order.total, order.currency)}.`),
    lines,
    el("p", `A confirmation email is on its way to ${order.email}.`),
  );
  if (replayed) box.append(el("p", "(Your retry reached an order already placed: you have not ordered twice.)", "hint"));
  box.append(payStep(order));
  box.hidden = false;
}

// ------------------------------------------------------------------ pay

/** Stops watching the order of the pay step on show (one pay step at a time). */
let stopWatch: (() => void) | null = null;

const duration = (seconds: number) =>
  seconds >= 120 ? `${Math.round(seconds / 60)} minutes` : `${seconds} second${seconds === 1 ? "" : "s"}`;

/** A pending order's pay step from the orders list (after a reload, or a later visit). */
function showPayStep(order: Order): void {
  const box = $("#confirmation");
  box.replaceChildren(
    el("h3", "Pay for your order"),
    el("p", `Order ${order.id}, total ${formatMoney(order.total, order.currency)}.`),
    payStep(order),
  );
  box.hidden = false;
  box.scrollIntoView({ block: "nearest" });
}

function payStep(order: Order): HTMLElement {
  stopWatch?.();
  stopWatch = null;
  const step = el("section", "", "pay-step");
  step.id = "payment";
  step.dataset.order = order.id;
  step.dataset.state = "pending";
  const state = el("p", "", "pay-status");
  state.id = "payment-status";
  state.setAttribute("role", "status");
  state.setAttribute("aria-live", "polite");
  step.append(el("h4", "Payment"));
  const deadline = paymentDeadline(order, paymentTimeoutS);
  if (deadline !== null && paymentTimeoutS !== null) {
    const due = `Please pay by ${deadline.toLocaleTimeString()}: unpaid orders are cancelled ${duration(paymentTimeoutS)} after they are placed.`;
    step.append(el("p", due, "deadline"));
  }
  if (provider === null) {
    step.append(el("p", "No payment provider is configured for this page (`make demo` starts a test one): the order stays pending.", "hint"), state);
  } else {
    step.append(payForm(step, order), state);
  }
  stopWatch = watchOrder(client, order, paymentTimeoutS, (now) => void showSettled(step, now));
  return step;
}

function payForm(step: HTMLElement, order: Order): HTMLFormElement {
  const form = el("form", "", "pay-form");
  const cards = el("fieldset");
  cards.append(el("legend", "Test card"));
  TEST_CARDS.forEach(({ card, label }, index) => {
    const input = el("input");
    Object.assign(input, { type: "radio", name: "card", value: card, checked: index === 0 });
    const option = el("label", "", "card");
    option.append(input, ` ${label}`);
    cards.append(option);
  });
  const button = el("button", `Pay ${formatMoney(order.total, order.currency)}`);
  button.type = "submit";
  button.id = "pay";
  form.append(cards, button);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const card = (form.elements.namedItem("card") as RadioNodeList).value as Card;
    void runPayment(step, order, card);
  });
  return form;
}

function payState(step: HTMLElement, state: string, text: string, error = false): void {
  step.dataset.state = state;
  const line = step.querySelector<HTMLElement>(".pay-status");
  if (line === null) return;
  line.textContent = text;
  line.classList.toggle("error", error);
}

async function runPayment(step: HTMLElement, order: Order, card: Card): Promise<void> {
  if (provider === null) return;
  const button = step.querySelector<HTMLButtonElement>("#pay");
  if (button) button.disabled = true;
  // The watch could report an expiry while the payment is under way: the answer tells first.
  stopWatch?.();
  payState(step, "paying", "Paying with the test card…");
  const result = await pay(provider, order, card);
  // Another order's pay step replaced this one meanwhile: its watch is that step's.
  if (!step.isConnected) return;
  if (result.kind === "answered" && result.outcome === "recorded") {
    if (button) button.disabled = false;
    payState(step, "declined", "Your card was declined. Nothing was charged: choose another card and try again.", true);
    stopWatch = watchOrder(client, order, paymentTimeoutS, (now) => void showSettled(step, now));
    return;
  }
  if (result.kind !== "answered" || !["paid", "duplicate", "refund_required"].includes(result.outcome)) {
    // Where the order stands decides what the buyer may do next.
    const now = (await settle(client, order.id, 1)) ?? order;
    if (!step.isConnected) return;
    if (now.status !== "pending") {
      void showSettled(step, now);
      return;
    }
    const why =
      result.kind === "answered"
        ? result.outcome === "amount_mismatch"
          ? "the amount paid is not the order's total (it will be refunded)"
          : `the shop answered “${result.outcome}”`
        : result.kind === "refused"
          ? result.detail
          : `the payment provider could not be reached (${result.reason})`;
    if (button) button.disabled = false;
    payState(step, "failed", `The payment did not go through: ${why}. Your order is still unpaid: try again.`, true);
    stopWatch = watchOrder(client, order, paymentTimeoutS, (now) => void showSettled(step, now));
    return;
  }
  payState(step, "confirming", "Payment sent: waiting for the shop to confirm it…");
  const now = await settle(client, order.id);
  if (!step.isConnected) return;
  if (now === null || now.status === "pending") {
    payState(step, "confirming", "The shop has not confirmed your payment yet: this page shows it when it does.");
    stopWatch = watchOrder(client, order, null, (later) => void showSettled(step, later));
    return;
  }
  // refund_required: this payment came after an expiry (or a cancel), or after another payment.
  const refund =
    result.outcome !== "refund_required"
      ? ""
      : now.status === "cancelled"
        ? " Your payment arrived after that: it will be refunded."
        : " This order was already paid: this second payment will be refunded.";
  await showSettled(step, now, refund);
}

/** The pay step of an order that is no longer pending: paid, or cancelled and why. */
async function showSettled(step: HTMLElement, order: Order, note = ""): Promise<void> {
  if (!step.isConnected) return;
  stopWatch?.();
  step.querySelector(".pay-form")?.remove();
  step.querySelector(".deadline")?.remove();
  if (order.status === "cancelled") {
    const reason = await cancelReason(client, order.id);
    const why =
      reason === "payment_timeout"
        ? `it was not paid in time${paymentTimeoutS === null ? "" : ` (within ${duration(paymentTimeoutS)})`}. Nothing was charged and its items are back in stock: order again to buy them.`
        : reason === "customer"
          ? "you cancelled it."
          : "the shop cancelled it.";
    payState(step, "cancelled", `This order is cancelled: ${why}${note}`, true);
    void loadProducts();
  } else {
    payState(step, "paid", `Paid: thank you! The receipt is on its way to ${order.email}.${note}`);
  }
  void loadOrders();
}

async function place(attempt: Attempt): Promise<void> {
  clearFieldErrors();
  $("#confirmation").hidden = true;
  $<HTMLButtonElement>("#place").disabled = true;
  say("Placing your order…");
  const outcome = await submit(client, attempt, (retry, waitMs, why) =>
    say(`Still placing your order (${why}); trying again in ${Math.ceil(waitMs / 1000)} s (retry ${retry})…`),
  );
  showOutcome(outcome);
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  if (cart.size === 0) {
    say("Your cart is empty.", true);
    return;
  }
  void place(attemptFor(orderBody()));
});

// ------------------------------------------------------------------ the customer's orders

let orderCursor: string | null = null;
const shown = new Map<string, HTMLLIElement>();

async function loadOrders(more = false): Promise<void> {
  const answer = await reach(
    () =>
      client.GET("/v1/orders", {
        params: { query: { limit: PAGE_SIZE, ...(more && orderCursor ? { cursor: orderCursor } : {}) } },
        signal: timeout(),
      }),
    $("#order-list"),
    "Your orders",
  );
  if (answer === null) return;
  const { data, error } = answer;
  if (data === undefined) {
    $("#order-list").replaceChildren(el("li", `Your orders could not be loaded: ${explain(error, null)}`));
    return;
  }
  if (!more) {
    shown.clear();
    $("#order-list").replaceChildren();
  }
  for (const order of data.items) {
    const row = el("li");
    row.dataset.order = order.id;
    shown.set(order.id, row);
    renderOrder(row, order);
    $("#order-list").append(row);
  }
  if (!more && data.items.length === 0) $("#order-list").append(el("li", "No orders yet."));
  orderCursor = data.next_cursor ?? null;
  $("#more-orders").hidden = orderCursor === null;
}

function renderOrder(row: HTMLLIElement, order: Order, note = ""): void {
  const when = new Date(order.created_at).toLocaleString();
  const items = order.items.map((item) => `${item.quantity} × ${item.name}`).join(", ");
  row.replaceChildren(
    el("span", when),
    el("span", order.status, "status"),
    el("span", formatMoney(order.total, order.currency)),
    el("span", items),
    el("span", order.id.slice(0, 8), "sku"),
  );
  if (order.status === "pending" && provider !== null) {
    const payButton = el("button", "Pay");
    payButton.type = "button";
    payButton.addEventListener("click", () => showPayStep(order));
    row.append(payButton);
  }
  if (order.status === "pending" || order.status === "paid") {
    const cancel = el("button", "Cancel");
    cancel.type = "button";
    cancel.addEventListener("click", () => void cancelOrder(row, order));
    row.append(cancel);
  }
  if (note) row.append(el("span", note, "question"));
}

/** Cancel with If-Match: the order's version as the buyer saw it. On 412 the order changed
 *  elsewhere (paid, cancelled...): show it as it is now and ask again. */
async function cancelOrder(row: HTMLLIElement, seen: Order): Promise<void> {
  try {
    await tryCancel(row, seen);
  } catch {
    // The answer was lost: pressing Cancel again sends the same If-Match. Had the first one
    // gone through, that answers 412 or 409, and the order is shown as it now is.
    renderOrder(row, seen, "The shop could not be reached: press Cancel again.");
  }
}

async function tryCancel(row: HTMLLIElement, seen: Order): Promise<void> {
  const { data, error } = await client.POST("/v1/orders/{order_id}/cancel", {
    params: { path: { order_id: seen.id }, header: { "If-Match": `"${seen.version}"` } },
    signal: timeout(),
  });
  if (data !== undefined) {
    renderOrder(row, data, "Cancelled.");
    void loadProducts();
    return;
  }
  const slug = problemSlug(error);
  if (slug !== "precondition-failed" && slug !== "invalid-transition") {
    renderOrder(row, seen, explain(error, null));
    return;
  }
  const fresh = await client.GET("/v1/orders/{order_id}", { params: { path: { order_id: seen.id } }, signal: timeout() });
  if (fresh.data === undefined) {
    renderOrder(row, seen, explain(fresh.error, null));
    return;
  }
  const now = fresh.data;
  if (now.status !== "pending" && now.status !== "paid") {
    renderOrder(row, now, `This order can no longer be cancelled: it is ${now.status}.`);
    return;
  }
  renderOrder(row, now);
  const question = el("span", `This order changed since you saw it (it is now ${now.status}). Cancel it anyway?`, "question");
  const yes = el("button", "Yes, cancel it");
  const no = el("button", "Keep it");
  yes.type = no.type = "button";
  yes.addEventListener("click", () => void cancelOrder(row, now));
  no.addEventListener("click", () => renderOrder(row, now));
  row.append(question, yes, no);
}

// ------------------------------------------------------------------ start

async function start(): Promise<void> {
  const jwt = token();
  if (!jwt) {
    $("#signin").hidden = false;
    $("#signin-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = ($<HTMLInputElement>("#signin-form input").value || "").trim();
      if (value) {
        sessionStorage.setItem("checkout.token", value);
        location.reload();
      }
    });
    return;
  }
  $("#who").textContent = `Signed in as ${customerOf(jwt)}`;
  $("#shop").hidden = false;
  $("#more-products").addEventListener("click", () => void loadProducts(true));
  $("#more-orders").addEventListener("click", () => void loadOrders(true));
  await Promise.all([loadProducts(), loadOrders()]);
  // A reload while an attempt was being sent: send it again with its key and body. If the
  // first request had gone through, the service answers it again; it never orders twice.
  const attempt = currentAttempt();
  if (attempt !== null) {
    fillForm(attempt.body);
    if (attempt.sending) {
      say("Finishing the order you were placing…");
      await place(attempt);
    }
  }
}

void start();
