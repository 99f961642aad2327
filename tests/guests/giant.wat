;; Sends one 5 MiB request (over the 4 MiB default): must end with limit message_size.
(module
  (import "pie" "call" (func $call (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 100)   ;; 6.25 MiB
  (func (export "_start")
    (drop (call $call (i32.const 0) (i32.const 5242880) (i32.const 0) (i32.const 1024)))))
