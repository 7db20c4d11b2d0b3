//! Copies the FileDescriptorSet that `envoy-types` ships (compiled from the same
//! .proto files as its Rust types) into OUT_DIR, so that `sockmesh-proto` can decode
//! proto3 JSON/YAML of any Envoy type by reflection. `envoy-types` does not export
//! the set, so its package directory is found through `cargo metadata`.
//! The comments are left out (see below).

use std::{env, fs, path::PathBuf, process::Command};

use prost::Message;

fn main() {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--filter-platform"])
        .arg(env::var("TARGET").expect("TARGET"))
        .arg("--manifest-path")
        .arg(manifest.join("Cargo.toml"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let package = meta["packages"]
        .as_array()
        .and_then(|ps| {
            ps.iter().find(|p| {
                p["name"] == "envoy-types"
                    && p["version"].as_str().is_some_and(|v| v.starts_with("0.7."))
            })
        })
        .expect("envoy-types 0.7 in the dependency graph");
    let dir = PathBuf::from(package["manifest_path"].as_str().expect("manifest_path"))
        .parent()
        .expect("package dir")
        .to_path_buf();
    let set = dir.join("src/generated/types.bin");
    let dest = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("envoy_descriptors.bin");
    // Without source_code_info (the .proto files' comments and spans: 2.7 of the
    // set's 3.4 MB, and most of the time it takes to decode at start-up).
    let bytes = fs::read(&set).unwrap_or_else(|e| panic!("reading {}: {e}", set.display()));
    let mut files = prost_types::FileDescriptorSet::decode(bytes.as_slice())
        .unwrap_or_else(|e| panic!("decoding {}: {e}", set.display()));
    for file in &mut files.file {
        file.source_code_info = None;
    }
    fs::write(&dest, files.encode_to_vec())
        .unwrap_or_else(|e| panic!("writing {}: {e}", dest.display()));
    // Every message's full name, sorted, one per line: what validation asks of an
    // `Any`'s type URL, answered without decoding the whole set (see lib.rs).
    let mut names = Vec::new();
    for file in &files.file {
        let package = file.package.clone().unwrap_or_default();
        for message in &file.message_type {
            message_names(&package, message, &mut names);
        }
    }
    names.sort();
    names.dedup();
    let list = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("message_names.txt");
    fs::write(&list, names.join("\n"))
        .unwrap_or_else(|e| panic!("writing {}: {e}", list.display()));
    println!("cargo:rerun-if-changed={}", set.display());
    println!("cargo:rerun-if-changed=build.rs");
}

/// `message`'s full name under `scope`, and its nested messages', into `out`.
fn message_names(scope: &str, message: &prost_types::DescriptorProto, out: &mut Vec<String>) {
    let name = match scope {
        "" => message.name().to_owned(),
        _ => format!("{scope}.{}", message.name()),
    };
    for nested in &message.nested_type {
        message_names(&name, nested, out);
    }
    out.push(name);
}
