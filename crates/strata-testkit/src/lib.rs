//! What the tests of several Strata crates share: running `qemu-img`, `qemu-io` and
//! `qemu-nbd` (panicking with the tool's output), qcow2 image builders, TLS certificates
//! made with openssl(1), and the seeded random number generator of the guest writers.

pub mod image;
pub mod pki;
pub mod process;
pub mod qemu;
pub mod rng;

pub use image::{qcow2_image, qcow2_overlay};
pub use pki::{Pki, make_pki};
pub use process::{KillOnDrop, have, run, run_in, run_stdout, wait_for_path};
pub use qemu::{qemu_img, qemu_io, qemu_nbd};
pub use rng::Xorshift;

/// One mebibyte.
pub const MIB: u64 = 1 << 20;
