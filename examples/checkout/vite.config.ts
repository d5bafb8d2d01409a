import { defineConfig } from "vite";

// A static page: `vite build` writes dist/, `vite preview` serves it on its own origin
// (the service must list that origin in ORDERS_CORS_ORIGINS).
export default defineConfig({
  build: { target: "es2022" },
  preview: { host: "127.0.0.1", port: 5173, strictPort: true },
});
