from fastacl.cli import main

raise SystemExit(main())
