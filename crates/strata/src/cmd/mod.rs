//! One module per subcommand: its flags (as qemu-img spells them) and its `run`.

pub mod amend;
pub mod bitmap;
pub mod check;
pub mod commit;
pub mod common;
pub mod compare;
pub mod convert;
pub mod create;
pub mod dd;
pub mod info;
pub mod job;
pub mod map;
pub mod measure;
pub mod rebase;
pub mod resize;
pub mod snapshot;
