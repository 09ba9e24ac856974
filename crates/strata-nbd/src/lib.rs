//! NBD for Strata: the protocol codec ([`proto`], pure functions, no I/O), the server that
//! exports block nodes ([`server`]), and the client that is itself a block node
//! ([`client`], driver `nbd`).

pub mod client;
pub mod proto;
pub mod server;

pub use client::{ClientOptions, HeaderMode, NbdAddr, NbdClient, NbdNode, NbdUri};
pub use server::{
    BoxStream, DirtySource, ExportConfig, ListenAddr, NbdServer, NbdStream, ServerOptions, TlsHook,
};
