//! The stock `gearshift` binary: the library's CLI with the built-in functions.

fn main() -> std::process::ExitCode {
    gearshift::cli::main(gearshift::Functions::with_builtins())
}
