//! analytics-repo against the real PostgreSQL and Redis: the reports' exactness, the report
//! cache over HTTP (and without Redis), archival killed and resumed, partition maintenance
//! beside long reports, bad input on every endpoint, the keyset listing, and PostgreSQL cut
//! off under the service.

mod archive;
mod bad_input;
mod cache;
mod listing;
mod outage;
mod partitions;
mod rollups;
mod support;
