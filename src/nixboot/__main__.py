from nixboot.cli import main

main()
