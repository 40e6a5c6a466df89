//! The workspace's one TLS stack: rustls with the aws-lc-rs crypto provider.
//!
//! rustls picks its process-level provider from its crate features, and refuses to pick (panics on
//! the first connection) when a build compiles in two — as Cargo's feature unification did when the
//! operator and the CLI were built together (kube and sqlx asked for `ring`, object_store for
//! `aws-lc-rs`). The workspace's dependencies now enable aws-lc-rs only, and every binary also
//! installs it explicitly at process start, so a dependency that brings a second provider later
//! cannot make TLS depend on which packages share a build.

/// Installs aws-lc-rs as the process-level rustls provider. Call it first thing in `main`; calling
/// it again (or after another provider was installed) changes nothing.
pub fn install_crypto_provider() {
    // `Err` only says a provider is installed already: that one stays, which is what we want.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
