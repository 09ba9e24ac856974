//! NBD for Strata: the protocol codec ([`proto`], pure functions, no I/O), the server that
//! exports block nodes ([`server`]), and the client that is itself a block node
//! ([`client`], driver `nbd`).

pub mod authz;
pub mod client;
pub mod driver;
#[doc(hidden)]
pub mod fuzzing;
pub mod proto;
pub mod server;
pub mod tls;

pub use authz::{Authorizer, AuthzList, AuthzRule, AuthzSimple, MatchFormat};
pub use client::{ClientOptions, HeaderMode, NbdAddr, NbdClient, NbdNode, NbdUri, TlsConnect};
pub use driver::{NbdDriverFactory, ReconnectingNbd};
pub use server::{
    BoxStream, DirtySource, ExportConfig, ListenAddr, NbdServer, NbdStream, ServerOptions, TlsHook,
};
pub use tls::{Endpoint, TlsCreds};
