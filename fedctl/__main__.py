from fedctl.cli import main

main()
