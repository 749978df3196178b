//! The Starling node agent: it joins the cluster model, the BGP speaker, the
//! kernel FIB reconciler and IPAM on one node.
pub mod fib;
pub mod ipam;
pub mod model;
