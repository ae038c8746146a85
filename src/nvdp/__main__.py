from nvdp.cli import main

main()
