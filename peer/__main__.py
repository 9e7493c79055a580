from shoal.peer.cli import main

main()
