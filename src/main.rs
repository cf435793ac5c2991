//! The `capgate` command: `serve` the demo Store, run the `demo`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
