//! Arbitrary bytes as a whole segment file, walked by `verify` and opened
//! as a store: neither may panic, whatever the bytes.
#![no_main]

use std::{path::Path, sync::Arc};

use annals_log::{LogStore, io::FaultIo};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let io = FaultIo::new();
    let dir = Path::new("/fuzz");
    io.write_file(&dir.join(format!("{:020}.seg", 0)), data.to_vec());
    let _ = annals_log::verify_with(&io, dir);
    if let Ok(store) = LogStore::builder(dir).io(Arc::new(io)).segment_size(4096).open() {
        let _ = store.close();
    }
});
