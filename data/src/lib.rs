//! Real inputs fetched at run time from package registries into a checksummed cache.
//!
//! OWNER: helper C. See the module docs for the interface.
