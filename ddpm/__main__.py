from ddpm.cli import entry

entry()
