import os
import sys

# The tests import the top-level modules (triadapt, model, data, train) the way a user does.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
