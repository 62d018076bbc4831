from ddpm.runtime.cli import entry

entry()
