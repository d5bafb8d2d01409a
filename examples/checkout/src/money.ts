// Amounts are integers in the currency's minor unit (docs/API.md): 1299 USD is $12.99,
// 1500 JPY is ¥1,500, 1250 KWD is KWD 1.250. The exponent is ISO 4217's, as the service
// has it (MINOR_UNITS, generated from the OpenAPI document): Intl's own differs for some
// (it shows HUF and IDR without decimals), so it is only asked for the symbol and grouping.
import { MINOR_UNITS } from "./api/currencies";

const formats = new Map<string, Intl.NumberFormat>();

export function formatMoney(minor: number, currency: string): string {
  const digits = MINOR_UNITS[currency] ?? 2;
  let format = formats.get(currency);
  if (format === undefined) {
    format = new Intl.NumberFormat(undefined, {
      style: "currency",
      currency,
      minimumFractionDigits: digits,
      maximumFractionDigits: digits,
    });
    formats.set(currency, format);
  }
  return format.format(minor / 10 ** digits);
}
