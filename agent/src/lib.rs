//! The Starling node agent: it joins the cluster model, the BGP speaker, the
//! kernel FIB reconciler and IPAM on one node.
pub mod autodetect;
pub mod encap;
pub mod fib;
pub mod health;
pub mod install;
pub mod ipam;
pub mod lab;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod mtu;
pub mod nat;
pub mod node;
pub mod runtime;
pub mod services;
