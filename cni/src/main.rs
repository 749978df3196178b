//! The `starling` CNI plugin.
fn main() {
    eprintln!("starling: the CNI plugin is not built yet");
    std::process::exit(1);
}
