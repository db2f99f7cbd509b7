from popguard.cli.main import main

main()
