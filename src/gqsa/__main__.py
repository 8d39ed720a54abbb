from gqsa.cli import main
import sys
sys.exit(main())
