from nfsreset.cli.main import main

main()
