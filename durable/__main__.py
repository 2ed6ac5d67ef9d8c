from durable.cli import main

main()
