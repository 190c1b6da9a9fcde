//! The conformance suite on the log backend, one temporary directory per test.
annals_conformance::suite!(async {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = annals_log::LogStore::builder(dir.path()).open().expect("open");
    annals_conformance::Fixture::with_guard(store, dir)
});
