// The checkout page in Debian's Chromium (playwright-core, no browser download), cross-origin
// against a real `orders serve` with PostgreSQL, Redis and an SMTP sink: started by e2e/run.py,
// which passes their addresses in E2E_*. Checks against the service go through the same
// generated client as the page (openapi-fetch; types are not checked in this .mjs file).
import assert from "node:assert/strict";
import { mkdirSync, readdirSync, readFileSync } from "node:fs";
import { after, before, test } from "node:test";
import createClient from "openapi-fetch";
import { chromium } from "playwright-core";

const API = process.env.E2E_API;
const PAGE = process.env.E2E_PAGE;
const PROVIDER = process.env.E2E_PROVIDER;
const PAYMENT_TIMEOUT_S = Number(process.env.E2E_PAYMENT_TIMEOUT_S);
const EXPIRY_API = process.env.E2E_EXPIRY_API;
const EXPIRY_TIMEOUT_S = Number(process.env.E2E_EXPIRY_TIMEOUT_S);
const MAIL_DIR = process.env.E2E_MAIL_DIR;
const TOKENS = JSON.parse(process.env.E2E_TOKENS ?? "{}");
const RATE_LIMIT = Number(process.env.E2E_RATE_LIMIT);
const SHOTS = new URL("./screenshots/", import.meta.url).pathname;
const UUID = /[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/;
const ADDRESS = { name: "Ada Lovelace", line1: "1 Main St", city: "London", postal_code: "N1 9GU", country: "GB" };

let browser;

before(async () => {
  assert.ok(API && PAGE && MAIL_DIR && PROVIDER && EXPIRY_API, "run through e2e/run.py (make e2e)");
  mkdirSync(SHOTS, { recursive: true });
  // launch() gives every run a fresh, temporary --user-data-dir of its own.
  browser = await chromium.launch({
    executablePath: process.env.E2E_CHROMIUM ?? "/usr/bin/chromium",
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
    timeout: 60_000,
  });
});

after(async () => {
  await browser?.close();
});

function api(who, baseUrl = API) {
  const client = createClient({ baseUrl });
  client.use({
    onRequest({ request }) {
      request.headers.set("Authorization", `Bearer ${TOKENS[who]}`);
      return request;
    },
  });
  return client;
}

async function ordersOf(who, baseUrl = API) {
  const { data, error } = await api("admin", baseUrl).GET("/v1/orders", {
    params: { query: { customer_id: `e2e-${who}`, limit: 100 } },
  });
  assert.equal(error, undefined);
  return data.items;
}

/** A new browser context (fresh sessionStorage) on the page, signed in as `who`, with the
 *  payment provider and the service's payment timeout in its address (as `make demo` does). */
async function open(who, { baseUrl = API, timeoutS = PAYMENT_TIMEOUT_S } = {}) {
  const context = await browser.newContext({ locale: "en-US", timezoneId: "UTC", viewport: { width: 1280, height: 1000 } });
  const page = await context.newPage();
  page.setDefaultTimeout(20_000);
  const url = new URL(PAGE);
  url.searchParams.set("api", baseUrl);
  url.searchParams.set("provider", PROVIDER);
  url.searchParams.set("payment_timeout_s", String(timeoutS));
  url.searchParams.set("token", TOKENS[who]);
  await page.goto(url.href);
  await page.locator("#products tr[data-sku]").first().waitFor();
  return page;
}

async function addToCart(page, sku, quantity = 1) {
  const row = page.locator(`#products tr[data-sku="${sku}"]`);
  await row.locator("input").fill(String(quantity));
  await row.getByRole("button", { name: "Add to cart" }).click();
}

async function fillCheckout(page, email, address = ADDRESS) {
  await page.locator('input[name="email"]').fill(email);
  for (const [name, value] of Object.entries(address)) await page.locator(`input[name="${name}"]`).fill(value);
}

async function placedOrderId(page) {
  const confirmation = page.locator("#confirmation");
  await confirmation.getByText("Thank you, your order is placed").waitFor();
  const id = (await confirmation.textContent()).match(UUID)?.[0];
  assert.ok(id, "the confirmation names the order");
  return id;
}

async function mailAbout(orderId, timeoutMs = 20_000, kind = "created") {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    let files = [];
    try {
      files = readdirSync(MAIL_DIR).filter((f) => f.endsWith(".eml"));
    } catch {}
    for (const file of files) {
      const text = readFileSync(`${MAIL_DIR}/${file}`, "utf8");
      if (text.includes(`<order-${orderId}.${kind}@orders>`)) return text;
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  assert.fail(`no ${kind} email for ${orderId} in the SMTP sink within ${timeoutMs} ms`);
}

/** Places one MUG-001 order on the page; its id. */
async function placeMug(page, email) {
  await addToCart(page, "MUG-001");
  await fillCheckout(page, email);
  await page.getByRole("button", { name: "Place order" }).click();
  return placedOrderId(page);
}

/** Every request the page makes, to check that none reaches the webhook. */
function requestsOf(page) {
  const seen = [];
  page.on("request", (r) => seen.push({ method: r.method(), url: r.url(), headers: r.headers() }));
  return seen;
}

function assertNoWebhookFromBrowser(requests) {
  for (const r of requests) {
    assert.ok(!r.url.includes("/v1/payments/events"), `the browser called the webhook: ${r.url}`);
    assert.equal(r.headers["payment-signature"], undefined, "the browser signed something");
  }
}

async function timeline(id, baseUrl = API) {
  const { data } = await api("admin", baseUrl).GET("/v1/orders/{order_id}/events", { params: { path: { order_id: id } } });
  return data.items;
}

// Whitespace normalised: ICU versions differ on the space before AM/PM.
const time = (ms) => new Date(ms).toLocaleTimeString("en-US", { timeZone: "UTC" }).replace(/\s/g, " ");

test("browse the catalog, order, get the confirmation email", async () => {
  const page = await open("buyer");
  const price = (sku) => page.locator(`#products tr[data-sku="${sku}"] td`).nth(1).textContent();
  assert.equal(await price("MUG-001"), "$12.99");
  assert.equal(await price("TEA-JP"), "¥1,500");
  assert.equal(await price("DATES-KW"), "KWD\u00a01.250");
  assert.equal(await page.locator('#products tr[data-sku="LAMP-LTD"] td').nth(2).textContent(), "2");

  await addToCart(page, "MUG-001", 2);
  await addToCart(page, "POSTER-A2");
  assert.equal(await page.locator("#cart-total").textContent(), "Total: $43.98");
  await fillCheckout(page, "ada@example.com");
  await page.getByRole("button", { name: "Place order" }).click();
  const id = await placedOrderId(page);
  await page.locator(`#order-list li[data-order="${id}"]`).waitFor();
  await page.screenshot({ path: `${SHOTS}checkout.png`, fullPage: true });

  const mail = await mailAbout(id);
  assert.match(mail, /^To: ada@example\.com/m);
  const orders = await ordersOf("buyer");
  assert.deepEqual(orders.map((o) => [o.id, o.total, o.status]), [[id, 4398, "pending"]]);
  await page.context().close();
});

test("the first POST is lost after it reached the service: the retry orders once", async () => {
  const page = await open("retry");
  const keys = [];
  let firstStatus;
  await page.route(`${API}/v1/orders`, async (route) => {
    if (route.request().method() !== "POST") return route.continue();
    keys.push(route.request().headers()["idempotency-key"]);
    if (keys.length > 1) return route.continue();
    const response = await route.fetch(); // the service gets it and places the order...
    firstStatus = response.status();
    await route.abort("connectionreset"); // ...and the page never hears back
  });
  await addToCart(page, "MUG-001");
  await fillCheckout(page, "retry@example.com");
  await page.getByRole("button", { name: "Place order" }).click();
  const id = await placedOrderId(page);
  await page.getByText("you have not ordered twice").waitFor();

  assert.equal(firstStatus, 201);
  assert.equal(keys.length, 2);
  assert.ok(keys[0], "an Idempotency-Key was sent");
  assert.equal(keys[1], keys[0], "the retry reuses the attempt's key");
  assert.deepEqual((await ordersOf("retry")).map((o) => o.id), [id]);
  await page.context().close();
});

test("a 503 with Retry-After: the page waits, then retries with the same key", async () => {
  const page = await open("busy");
  const posts = [];
  await page.route(`${API}/v1/orders`, async (route) => {
    if (route.request().method() !== "POST") return route.continue();
    posts.push({ key: route.request().headers()["idempotency-key"], at: Date.now() });
    if (posts.length > 1) return route.continue();
    // What a draining replica answers (docs/API.md), with the CORS headers the service sends.
    await route.fulfill({
      status: 503,
      contentType: "application/problem+json",
      headers: {
        "Retry-After": "2",
        "Access-Control-Allow-Origin": new URL(PAGE).origin,
        "Access-Control-Expose-Headers": "ETag, Location, X-Request-ID, Idempotent-Replayed, Retry-After",
      },
      body: JSON.stringify({
        type: "https://orders.example/problems/unavailable", title: "Service unavailable", status: 503,
        detail: "the service is draining",
      }),
    });
  });
  await addToCart(page, "MUG-001");
  await fillCheckout(page, "busy@example.com");
  await page.getByRole("button", { name: "Place order" }).click();
  await page.locator("#checkout-status").getByText("Still placing your order (Service unavailable)").waitFor();
  const id = await placedOrderId(page);
  assert.equal(posts.length, 2);
  assert.equal(posts[1].key, posts[0].key);
  assert.ok(posts[1].at - posts[0].at >= 2000, "no retry before Retry-After");
  assert.deepEqual((await ordersOf("busy")).map((o) => o.id), [id]);
  await page.context().close();
});

test("a reload in the middle of a checkout attempt keeps its key", async () => {
  const page = await open("reload");
  const keys = [];
  let reached;
  const firstReached = new Promise((resolve) => (reached = resolve));
  await page.route(`${API}/v1/orders`, async (route) => {
    if (route.request().method() !== "POST") return route.continue();
    keys.push(route.request().headers()["idempotency-key"]);
    if (keys.length > 1) return route.continue();
    await route.fetch(); // placed; the answer never comes back: the buyer reloads meanwhile
    reached();
  });
  await addToCart(page, "POSTER-A2", 3);
  await fillCheckout(page, "reload@example.com");
  await page.getByRole("button", { name: "Place order" }).click();
  await firstReached;
  const stored = JSON.parse(await page.evaluate(() => sessionStorage.getItem("checkout.attempt")));
  assert.equal(stored.key, keys[0]);
  assert.equal(stored.sending, true);

  await page.reload();
  const id = await placedOrderId(page);
  assert.equal(keys.length, 2);
  assert.equal(keys[1], keys[0], "the reloaded page resent the attempt with its key");
  assert.equal(await page.evaluate(() => sessionStorage.getItem("checkout.attempt")), null);
  assert.deepEqual((await ordersOf("reload")).map((o) => o.id), [id]);
  await page.context().close();
});

test("insufficient stock and field errors read as sentences", async () => {
  const page = await open("errors");
  const status = page.locator("#checkout-status");
  await addToCart(page, "LAMP-LTD", 3);
  await fillCheckout(page, "errors@example.com");
  await page.getByRole("button", { name: "Place order" }).click();
  await status.getByText("Not enough stock for Limited lamp (LAMP-LTD), only 2 left.").waitFor();
  assert.match(await status.textContent(), /Lower the quantity and try again; nothing was reserved\./);
  await page.screenshot({ path: `${SHOTS}insufficient-stock.png`, fullPage: true });

  await page.locator('#cart-lines li[data-sku="LAMP-LTD"]').getByRole("button", { name: "Remove" }).click();
  await addToCart(page, "MUG-001");
  await fillCheckout(page, "not-an-email", { ...ADDRESS, country: "ZZ" });
  await page.getByRole("button", { name: "Place order" }).click();
  await status.getByText("Please correct the highlighted fields.").waitFor();
  assert.match(await page.locator('.field-error[data-field="email"]').textContent(), /email/i);
  assert.match(
    await page.locator('.field-error[data-field="shipping_address.country"]').textContent(),
    /ISO 3166-1 alpha-2/,
  );
  assert.equal(await page.locator('input[name="country"]').getAttribute("aria-invalid"), "true");
  assert.deepEqual(await ordersOf("errors"), []);
  await page.context().close();
});

test("429: the buyer is told how long to wait", async () => {
  // The limit is a fixed wall-clock minute: start early in one so that it cannot reset midway.
  const intoMinute = (Date.now() / 1000) % 60;
  if (intoMinute > 40) await new Promise((r) => setTimeout(r, (61 - intoMinute) * 1000));
  const client = api("limited");
  for (let n = 0; n < RATE_LIMIT; n++) {
    const { response } = await client.POST("/v1/orders", {
      params: { header: { "Idempotency-Key": `use-up-${n}` } },
      body: { email: "limited@example.com", items: [{ sku: "LAMP-LTD", quantity: 999 }], shipping_address: ADDRESS },
    });
    assert.equal(response.status, 409); // counted by the limit, nothing placed
  }
  const page = await open("limited");
  await addToCart(page, "MUG-001");
  await fillCheckout(page, "limited@example.com");
  await page.getByRole("button", { name: "Place order" }).click();
  const status = page.locator("#checkout-status");
  await status.getByText("You have placed too many orders in a short time.").waitFor();
  assert.match(await status.textContent(), /Please wait \d+ seconds? before trying again\./);
  await page.screenshot({ path: `${SHOTS}rate-limited.png`, fullPage: true });
  assert.deepEqual(await ordersOf("limited"), []);
  await page.context().close();
});

test("orders page by page; cancel with a stale If-Match asks again", async () => {
  const client = api("history");
  for (let n = 0; n < 6; n++) {
    const { response } = await client.POST("/v1/orders", {
      params: { header: { "Idempotency-Key": `history-${n}` } },
      body: { email: "history@example.com", items: [{ sku: "MUG-001", quantity: 1 }], shipping_address: ADDRESS },
    });
    assert.equal(response.status, 201);
  }
  const [newest] = await ordersOf("history");
  const page = await open("history");
  const rows = page.locator("#order-list li[data-order]");
  await rows.first().waitFor();
  assert.equal(await rows.count(), 5);
  await page.getByRole("button", { name: "Older orders" }).click();
  await rows.nth(5).waitFor();
  assert.equal(await page.getByRole("button", { name: "Older orders" }).isHidden(), true);

  // Staff mark the newest order paid while the buyer still sees it as pending (version 1).
  const paid = await api("admin").POST("/v1/orders/{order_id}/status", {
    params: { path: { order_id: newest.id } },
    body: { status: "paid" },
  });
  assert.equal(paid.response.status, 200);
  const row = page.locator(`#order-list li[data-order="${newest.id}"]`);
  assert.equal(await row.locator(".status").textContent(), "pending");
  const cancels = [];
  page.on("request", (r) => {
    if (r.method() === "POST" && r.url().endsWith("/cancel")) cancels.push(r.headers()["if-match"]);
  });
  await row.getByRole("button", { name: "Cancel" }).click();
  await row.getByText("This order changed since you saw it (it is now paid). Cancel it anyway?").waitFor();
  assert.equal(await row.locator(".status").textContent(), "paid");
  await row.getByRole("button", { name: "Yes, cancel it" }).click();
  await row.getByText("Cancelled.").waitFor();
  assert.equal(await row.locator(".status").textContent(), "cancelled");
  assert.deepEqual(cancels, ['"1"', '"2"']);
  const { data } = await api("admin").GET("/v1/orders/{order_id}", { params: { path: { order_id: newest.id } } });
  assert.equal(data.status, "cancelled");
  await page.context().close();
});

test("pay with the test card: the page reads the order until it is paid; the receipt email", async () => {
  const page = await open("payer");
  const requests = requestsOf(page);
  const id = await placeMug(page, "payer@example.com");
  const payment = page.locator("#payment");
  const [order] = await ordersOf("payer");
  assert.equal(
    (await payment.locator(".deadline").textContent()).replace(/\s/g, " "),
    `Please pay by ${time(Date.parse(order.created_at) + PAYMENT_TIMEOUT_S * 1000)}: unpaid orders are cancelled 15 minutes after they are placed.`,
  );
  // As with a provider whose webhook is late: the first read after paying still says pending.
  const reads = [];
  await page.route(`${API}/v1/orders/${id}`, async (route) => {
    if (route.request().method() !== "GET") return route.continue();
    const response = await route.fetch();
    const body = await response.json();
    reads.push(body.status);
    await route.fulfill({ response, json: reads.length === 1 ? { ...body, status: "pending" } : body });
  });
  const pays = [];
  page.on("request", (r) => {
    if (r.method() === "POST" && r.url() === `${PROVIDER}/pay`) pays.push(r.postDataJSON());
  });
  await payment.getByLabel(/4242/).check();
  await payment.getByRole("button", { name: "Pay $12.99" }).click();
  await payment.getByText("Paid: thank you! The receipt is on its way to payer@example.com.").waitFor();
  assert.equal(await payment.getAttribute("data-state"), "paid");
  assert.equal(await payment.getByRole("button", { name: /^Pay/ }).count(), 0);
  assert.deepEqual(reads.slice(0, 2), ["paid", "paid"], "read again after the (made up) pending answer");
  assert.deepEqual(pays.map((p) => [p.order_id, p.amount, p.currency, p.outcome]), [[id, 1299, "USD", "succeed"]]);
  await page.locator(`#order-list li[data-order="${id}"] .status`).getByText("paid").waitFor();
  await page.screenshot({ path: `${SHOTS}paid.png`, fullPage: true });

  const mail = await mailAbout(id, 20_000, "paid");
  assert.match(mail, /^To: payer@example\.com/m);
  assert.deepEqual((await ordersOf("payer")).map((o) => [o.id, o.status]), [[id, "paid"]]);
  const paidBy = (await timeline(id)).find((e) => e.type === "order.status_changed");
  assert.equal(paidBy.actor, "payment-provider");
  assert.equal(paidBy.data.payment_event_id, `evt_${pays[0].payment_id}`);
  assertNoWebhookFromBrowser(requests);
  await page.context().close();
});

test("a declined card: the buyer is told, nothing changes, and paying again succeeds", async () => {
  const page = await open("decliner");
  const requests = requestsOf(page);
  const id = await placeMug(page, "decliner@example.com");
  const payment = page.locator("#payment");
  await payment.getByLabel(/declined/).check();
  await payment.getByRole("button", { name: "Pay $12.99" }).click();
  await payment.getByText("Your card was declined. Nothing was charged: choose another card and try again.").waitFor();
  assert.equal(await payment.getAttribute("data-state"), "declined");
  await page.screenshot({ path: `${SHOTS}declined.png`, fullPage: true });
  assert.deepEqual((await ordersOf("decliner")).map((o) => [o.id, o.status]), [[id, "pending"]]);

  await payment.getByLabel(/4242/).check();
  await payment.getByRole("button", { name: "Pay $12.99" }).click();
  await payment.getByText("Paid: thank you!").waitFor();
  assert.deepEqual((await ordersOf("decliner")).map((o) => [o.id, o.status]), [[id, "paid"]]);
  const types = (await timeline(id)).map((e) => e.type).filter((t) => t.startsWith("payment.") || t.startsWith("order."));
  assert.deepEqual(types, ["order.created", "payment.failed", "order.status_changed"]);
  assertNoWebhookFromBrowser(requests);
  await page.context().close();
});

test("an order left unpaid past the payment timeout shows as cancelled", async () => {
  // The expiry service: ORDERS_PAYMENT_TIMEOUT_S=3, its own database (run.py).
  const page = await open("expiry", { baseUrl: EXPIRY_API, timeoutS: EXPIRY_TIMEOUT_S });
  const id = await placeMug(page, "expiry@example.com");
  const payment = page.locator("#payment");
  assert.match(await payment.locator(".deadline").textContent(), /unpaid orders are cancelled 3 seconds after they are placed\.$/);
  // Nobody pays: the page watches the order past its deadline and says what happened.
  await payment
    .getByText("This order is cancelled: it was not paid in time (within 3 seconds). Nothing was charged")
    .waitFor({ timeout: 30_000 });
  assert.equal(await payment.getAttribute("data-state"), "cancelled");
  assert.equal(await payment.getByRole("button", { name: /^Pay/ }).count(), 0);
  await page.locator(`#order-list li[data-order="${id}"] .status`).getByText("cancelled").waitFor();
  await page.screenshot({ path: `${SHOTS}expired.png`, fullPage: true });

  assert.deepEqual((await ordersOf("expiry", EXPIRY_API)).map((o) => [o.id, o.status]), [[id, "cancelled"]]);
  const cancelled = (await timeline(id, EXPIRY_API)).find((e) => e.type === "order.cancelled");
  assert.equal(cancelled.actor, "system");
  assert.equal(cancelled.data.reason, "payment_timeout");
  await page.context().close();
});
