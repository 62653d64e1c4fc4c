//! Streamed tensors (`GgufWriter::add_tensor_streamed`): bytes produced when
//! the file is written read back exactly like borrowed ones; a producer that
//! writes the wrong amount fails the write, naming the tensor, and
//! `write_file` then leaves nothing behind; and a real model rewritten with
//! every tensor streamed round-trips to identical metadata and tensors.

use minnow_gguf::{GgmlType, GgufFile, GgufWriter, Value};
use std::io::Write;
use std::path::PathBuf;

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("minnow-gguf-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn streamed_and_borrowed_tensors_read_back_alike() {
    let a: Vec<u8> = (0..12u8).collect();
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", Value::String("test".into())).unwrap();
    w.add_tensor("a", &[3], GgmlType::F32, &a[..]).unwrap();
    // Written in two pieces: producers may write in any number of calls.
    let n = w
        .add_tensor_streamed("b", &[32, 2], GgmlType::Q8_0, |out: &mut dyn Write| {
            out.write_all(&[7u8; 30])?;
            out.write_all(&[9u8; 38])
        })
        .unwrap();
    assert_eq!(n, 68);
    w.add_tensor("c", &[1], GgmlType::F32, vec![1, 2, 3, 4]).unwrap();
    let names: Vec<_> = w.tensor_infos().map(|(n, d, t)| (n.to_string(), d.to_vec(), t)).collect();
    assert_eq!(names[1], ("b".to_string(), vec![32, 2], GgmlType::Q8_0));

    let bytes = w.to_bytes();
    // Producing again gives the same file (write_to may be called repeatedly).
    assert_eq!(w.to_bytes(), bytes);
    let file = GgufFile::from_bytes(bytes).unwrap();
    let b = file.tensor("b").unwrap();
    assert_eq!((b.offset, b.n_bytes), (32, 68));
    let mut want = vec![7u8; 30];
    want.extend_from_slice(&[9u8; 38]);
    assert_eq!(file.tensor_data(b), &want[..]);
    // The tensor after it starts at the next aligned offset.
    assert_eq!(file.tensor("c").unwrap().offset, 128);
    assert_eq!(file.tensor_data_by_name("c"), Some(&[1u8, 2, 3, 4][..]));
}

#[test]
fn streamed_tensors_are_checked_like_others() {
    let mut w = GgufWriter::new();
    let err = w.add_tensor_streamed("x", &[16], GgmlType::Q4_0, |_: &mut dyn Write| Ok(())).unwrap_err().to_string();
    assert!(err.contains("block size 32"), "{err}");
    w.add_tensor("x", &[1], GgmlType::F32, vec![0; 4]).unwrap();
    let err = w.add_tensor_streamed("x", &[1], GgmlType::F32, |_: &mut dyn Write| Ok(())).unwrap_err().to_string();
    assert!(err.contains("duplicate"), "{err}");
}

#[test]
fn a_producer_that_writes_the_wrong_amount_fails_the_write() {
    for (wrote, word) in [(7usize, "7 bytes, 8 were declared"), (9, "more bytes than were declared")] {
        let mut w = GgufWriter::new();
        w.add_tensor_streamed("short_or_long", &[2], GgmlType::F32, move |out: &mut dyn Write| {
            out.write_all(&vec![0u8; wrote])
        })
        .unwrap();
        let err = w.write_to(Vec::new()).unwrap_err().to_string();
        assert!(err.contains("short_or_long") && err.contains(word), "{err}");

        // write_file removes its temporary file and does not create the target.
        let dir = temp_dir(&format!("bad-producer-{wrote}"));
        let path = dir.join("bad.gguf");
        let err = w.write_file(&path).unwrap_err().to_string();
        assert!(err.contains("short_or_long"), "{err}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn a_producer_error_fails_the_write() {
    let mut w = GgufWriter::new();
    w.add_tensor_streamed("broken", &[1], GgmlType::F32, |_: &mut dyn Write| {
        Err(std::io::Error::other("quantizer exploded"))
    })
    .unwrap();
    let err = w.write_to(Vec::new()).unwrap_err().to_string();
    assert!(err.contains("broken") && err.contains("quantizer exploded"), "{err}");
}

/// A real model rewritten with every tensor streamed (from the mapped
/// original) reads back with identical metadata, tensor table and data.
#[test]
fn real_model_streamed_round_trip() {
    let dir = match std::env::var_os("MINNOW_MODELS") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/minnow/models"),
    };
    let path = dir.join("smollm2-135m-instruct-q4_1.gguf");
    if !path.exists() {
        eprintln!("skipping: model {} not found", path.display());
        return;
    }
    let original = GgufFile::open(&path).unwrap();
    let mut w = GgufWriter::new();
    for (key, value) in original.metadata() {
        w.add_metadata(key.clone(), value.clone()).unwrap();
    }
    for t in original.tensors() {
        let data = original.tensor_data(t);
        // Streamed in 1000-byte pieces to exercise partial writes.
        w.add_tensor_streamed(t.name.clone(), &t.dims, t.ty, move |out: &mut dyn Write| {
            data.chunks(1000).try_for_each(|c| out.write_all(c))
        })
        .unwrap();
    }
    let tmp = temp_dir("streamed-round-trip");
    let copy_path = tmp.join("copy.gguf");
    w.write_file(&copy_path).unwrap();
    let copy = GgufFile::open(&copy_path).unwrap();
    assert_eq!(copy.metadata(), original.metadata());
    assert_eq!(copy.tensors(), original.tensors());
    for t in original.tensors() {
        assert!(copy.tensor_data(t) == original.tensor_data(t), "{}", t.name);
    }
    drop(copy);
    std::fs::remove_dir_all(&tmp).unwrap();
}
