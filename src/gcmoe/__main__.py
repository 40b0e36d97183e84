from gcmoe.cli import main

main()
