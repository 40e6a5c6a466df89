//! Test harness for the platform: a real `kube-apiserver` with etcd on loopback ports (the role
//! envtest plays for controller-runtime projects), the PKI it needs, and a local HTTPS responder
//! that proves a binary completes a real TLS handshake.
//!
//! The server binaries come from a directory named by `LACUNA_ENVTEST_ASSETS` (`kube-apiserver`,
//! `etcd`, `kubectl`, `helm`; `scripts/envtest-assets.sh` prepares it). Nothing here runs pods or
//! controllers: a test that needs a Job to finish patches the Job's status itself.

mod apiserver;
mod https;
mod pki;

pub use apiserver::{ASSETS_ENV, Envtest, assets_dir, binary_under_test, free_port, write_kubeconfig};
pub use https::{HttpsResponder, https_get};
pub use pki::Pki;
