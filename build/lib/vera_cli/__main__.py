from vera_cli.entry import main

main()
