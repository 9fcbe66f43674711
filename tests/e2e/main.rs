//! End-to-end tests: the real `hybroker` binary's services as separate processes, real mutual TLS,
//! port 0, conditions waited on with deadlines. One test binary, so it links once.

mod bad_input;
mod bench;
mod capacity;
mod capacity_aws;
mod cli;
mod common;
mod conformance;
mod data;
mod deploy;
mod ec2_proxy;
mod emulators;
mod enrol;
mod fleet_admin;
mod gateway;
mod handshakes;
mod identity;
mod isolation;
mod lifecycle;
mod metrics;
mod moto_ec2;
mod operator_cli;
mod placement;
mod product;
mod reload;
mod renewal;
mod restart;
mod revocation;
mod sandbox;
mod secrets;
mod sites;
mod stores;
mod tenants;
mod traces;
