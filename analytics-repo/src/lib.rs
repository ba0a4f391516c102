//! Tenant analytics on partitioned PostgreSQL: raw events in monthly partitions made ahead by
//! the service, per-tenant daily rollups kept exact as events arrive (late ones included), the
//! reports read from rollups for closed days and raw rows for the open one in one snapshot, a
//! Redis cache-aside with versioned invalidation and single-flight, and verified archival of
//! old months to zstd-compressed CSV. `analytics-repo/README.md` has the design, the plans and
//! the figures.
//!
//! # Layout
//! - [`event`]: an event parsed at the edge (parse, don't validate).
//! - [`repository`]: [`repository::EventRepository`], every statement over the events: ingest
//!   by three paths, closing days, the reports, the listing, tenants.
//! - [`partitions`]: monthly partitions made ahead without stalling ingest; the default
//!   partition drained.
//! - [`archive`]: export, verify, detach and drop old months; restore them.
//! - [`cache`]: the Redis report cache and single-flight.
//! - [`db`]: the tuned pool and the migrations.
//! - [`http`], [`startup`], [`metrics`]: the service.
//! - [`seed`]: generated data for trials and the load test.

pub mod archive;
pub mod cache;
pub mod db;
pub mod event;
pub mod http;
pub mod metrics;
pub mod partitions;
pub mod repository;
pub mod seed;
pub mod startup;
