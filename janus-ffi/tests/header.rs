//! `include/janus.h` is what cbindgen makes of the crate today (run with `JANUS_BLESS=1` to
//! rewrite it after changing the API).

use std::path::Path;

#[test]
fn the_checked_in_header_is_current() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config =
        cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(crate_dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen")
        .write(&mut generated);
    let generated = String::from_utf8(generated).expect("UTF-8 header");
    let header = crate_dir.join("../include/janus.h");
    if std::env::var_os("JANUS_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&header, &generated).expect("write include/janus.h");
        return;
    }
    let current = std::fs::read_to_string(&header).unwrap_or_default();
    assert!(
        current == generated,
        "include/janus.h is stale: regenerate it with \
         `JANUS_BLESS=1 cargo test -p janus-ffi --test header`"
    );
}
