//! The order-saga binary: one subcommand per service process.

fn main() {}
