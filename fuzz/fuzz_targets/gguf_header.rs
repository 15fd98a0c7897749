//! Any bytes: `parse_header` returns a header or a typed error, never panics, never
//! allocates beyond what the input can back; a parsed header goes through the architecture description.
#![no_main]

use libfuzzer_sys::fuzz_target;
use starling::model::arch::describe;
use starling::model::gguf::parse_header;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = parse_header(data) {
        for t in &header.tensors {
            assert!(
                header.data_offset + t.offset + t.n_bytes <= data.len() as u64,
                "tensor `{}` out of bounds",
                t.name
            );
        }
        let _ = describe(&header);
    }
});
