from supermachine.cli import main

main()
