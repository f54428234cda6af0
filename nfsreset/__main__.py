from nfsreset.cli import main

main()
