//! End-to-end tests of meshscope live in `tests/`; they start the real binary and talk to
//! it with real clients (the OpenTelemetry SDK's OTLP exporters, HTTP, psql, a Postgres
//! driver, DuckDB). This library is empty on purpose: the crate exists for its tests.
