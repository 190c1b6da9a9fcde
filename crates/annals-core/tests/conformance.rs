//! The conformance suite on the in-memory reference backend.
annals_conformance::suite!(async { annals_conformance::Fixture::new(annals_core::MemoryStore::new()) });
