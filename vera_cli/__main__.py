from vera_cli.cli import main

main()
