from kmismatch_lite.cli import main

main()
